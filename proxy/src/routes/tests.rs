#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::*;
use crate::balance::Algorithm;
use crate::discovery::Endpoint;

fn backend(name: &str) -> Backend {
    let (_tx, rx) = watch::channel::<Arc<[Endpoint]>>(Arc::from(Vec::new()));
    Backend {
        service: name.into(),
        balancer: Balancer::new(name, Algorithm::RoundRobin, rx),
        queue_timeout: Duration::from_secs(3),
    }
}

fn route(prefix: Option<&str>, headers: &[(&str, &str)], backends: &[(&str, u32)]) -> Route {
    Route {
        path_prefix: prefix.map(str::to_owned),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect(),
        backends: backends.iter().map(|(b, w)| (backend(b), *w)).collect(),
        timeout: None,
        fault: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (n, v) in pairs {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

fn chosen(d: &Decision<'_>) -> Option<String> {
    d.backend.map(|b| b.service.to_string())
}

#[test]
fn path_prefix_matches_whole_segments() {
    assert!(path_matches("/v2", "/v2"));
    assert!(path_matches("/v2", "/v2/"));
    assert!(path_matches("/v2", "/v2/x/y"));
    assert!(!path_matches("/v2", "/v2beta"));
    assert!(!path_matches("/v2", "/v"));
    assert!(!path_matches("/v2", "/api/v2"));
    assert!(path_matches("/v2/", "/v2"));
    assert!(path_matches("/v2/", "/v2/x"));
    assert!(path_matches("/a/b", "/a/b/c"));
    assert!(!path_matches("/a/b", "/a/bc"));
    assert!(path_matches("/", "/"));
    assert!(path_matches("/", "/anything"));
}

#[test]
fn header_conditions_all_hold_names_any_case_values_exact() {
    let r = route(None, &[("x-canary", "1"), ("x-team", "blue")], &[("b", 1)]);
    assert!(matches(
        &r,
        "/",
        &headers(&[("X-Canary", "1"), ("X-TEAM", "blue")])
    ));
    assert!(
        !matches(&r, "/", &headers(&[("x-canary", "1")])),
        "both must hold"
    );
    assert!(!matches(
        &r,
        "/",
        &headers(&[("x-canary", "1"), ("x-team", "Blue")])
    ));
    assert!(!matches(
        &r,
        "/",
        &headers(&[("x-canary", "1 "), ("x-team", "blue")])
    ));
    // A repeated header matches when one of its values does.
    assert!(matches(
        &r,
        "/",
        &headers(&[("x-canary", "0"), ("x-canary", "1"), ("x-team", "blue")])
    ));
    let both = route(Some("/v2"), &[("x-canary", "1")], &[("b", 1)]);
    assert!(matches(&both, "/v2/x", &headers(&[("x-canary", "1")])));
    assert!(!matches(&both, "/v3", &headers(&[("x-canary", "1")])));
    assert!(!matches(&both, "/v2", &headers(&[])));
}

#[test]
fn first_match_wins_and_unmatched_goes_to_the_service() {
    let routes = Routes::new(
        vec![
            route(Some("/v2"), &[("x-canary", "1")], &[("canary", 1)]),
            route(Some("/v2"), &[], &[("v2", 1)]),
            route(None, &[("x-all", "yes")], &[("all", 1)]),
        ],
        Some(1),
        "t",
    );
    let canary = routes.decide("/v2/x", &headers(&[("x-canary", "1")]));
    assert_eq!(chosen(&canary).as_deref(), Some("canary"));
    assert_eq!(canary.label, "0");
    let v2 = routes.decide("/v2", &headers(&[("x-all", "yes")]));
    assert_eq!(chosen(&v2).as_deref(), Some("v2"));
    assert_eq!(v2.label, "1");
    let all = routes.decide("/v3", &headers(&[("x-all", "yes")]));
    assert_eq!(chosen(&all).as_deref(), Some("all"));
    assert_eq!(all.label, "2");
    let none = routes.decide("/v2beta", &headers(&[]));
    assert_eq!(chosen(&none), None);
    assert_eq!(none.label, "");
    assert!(
        Routes::default()
            .decide("/v2", &headers(&[]))
            .backend
            .is_none()
    );
}

#[test]
fn weighted_draw_gives_each_index_its_run() {
    let weights = [90u32, 0, 10];
    let mut counts = [0usize; 3];
    for draw in 0..100 {
        counts[pick_weighted(weights, draw).unwrap()] += 1;
    }
    assert_eq!(counts, [90, 0, 10]);
    assert_eq!(pick_weighted(weights, 100), None);
    assert_eq!(pick_weighted([0u32, 0], 0), None);
}

#[test]
fn weighted_choice_follows_the_weights() {
    let routes = Routes::new(
        vec![route(None, &[], &[("a", 90), ("b", 10), ("never", 0)])],
        Some(7),
        "t",
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10_000 {
        let d = routes.decide("/", &HeaderMap::new());
        *counts.entry(chosen(&d).unwrap()).or_default() += 1;
    }
    let a = counts.get("a").copied().unwrap_or(0);
    assert!((8_700..=9_300).contains(&a), "{counts:?}");
    assert!(!counts.contains_key("never"), "{counts:?}");
}

fn faulty(delay_percent: f64, abort_percent: f64) -> Route {
    let mut r = route(Some("/f"), &[], &[("b", 1)]);
    r.fault = Some(Fault {
        delay: Some(Duration::from_millis(100)),
        delay_percent,
        abort: Some(StatusCode::SERVICE_UNAVAILABLE),
        abort_percent,
    });
    r.timeout = Some(Duration::from_secs(2));
    r
}

#[test]
fn faults_follow_their_percentages() {
    let routes = Routes::new(vec![faulty(100.0, 0.0)], None, "t");
    let d = routes.decide("/f", &HeaderMap::new());
    assert_eq!(d.delay, Some(Duration::from_millis(100)));
    assert_eq!(d.abort, None);
    assert_eq!(d.timeout, Some(Duration::from_secs(2)));

    let routes = Routes::new(vec![faulty(0.0, 25.0)], Some(3), "t");
    let aborted = (0..4_000)
        .filter(|_| routes.decide("/f", &HeaderMap::new()).abort.is_some())
        .count();
    assert!((800..=1_200).contains(&aborted), "{aborted}");
    // Unmatched requests get no fault.
    assert_eq!(routes.decide("/g", &HeaderMap::new()).abort, None);
}

#[test]
fn a_seed_repeats_the_sequence_and_streams_differ() {
    let sequence = |seed: Option<u64>, stream: &str| -> Vec<(bool, bool)> {
        let routes = Routes::new(vec![faulty(50.0, 50.0)], seed, stream);
        (0..64)
            .map(|_| {
                let d = routes.decide("/f", &HeaderMap::new());
                (d.delay.is_some(), d.abort.is_some())
            })
            .collect()
    };
    let first = sequence(Some(42), "web>api");
    assert_eq!(first, sequence(Some(42), "web>api"));
    assert_ne!(first, sequence(Some(43), "web>api"));
    assert_ne!(first, sequence(Some(42), "ingress>api"));
    assert!(first.iter().any(|(_, a)| *a) && first.iter().any(|(_, a)| !*a));
}

#[test]
fn tcp_connections_take_the_first_route() {
    let routes = Routes::new(
        vec![
            route(None, &[], &[("t2", 1)]),
            route(None, &[], &[("t3", 1)]),
        ],
        None,
        "t",
    );
    assert_eq!(chosen(&routes.decide_connection()).as_deref(), Some("t2"));
    let names: Vec<String> = routes
        .backends()
        .iter()
        .map(|b| b.service.to_string())
        .collect();
    assert_eq!(names, ["t2", "t3"]);
}
