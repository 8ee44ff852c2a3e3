#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::discovery::{Endpoint, Registry};

fn ep(replica: usize) -> Endpoint {
    Endpoint {
        id: format!("api.{replica}").into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + replica as u16)),
    }
}

fn setup(n: usize, algorithm: Algorithm) -> (Registry, Balancer) {
    let registry = Registry::new();
    registry.set("api", (0..n).map(ep).collect());
    let balancer = Balancer::new("api", algorithm, registry.watch("api"));
    (registry, balancer)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

/// The in-flight count the balancer holds for `id`.
fn in_flight(balancer: &Balancer, id: &str) -> usize {
    let state = balancer.shared.state.lock();
    state
        .order
        .iter()
        .find(|ep| &*ep.endpoint.id == id)
        .map_or(0, |ep| ep.in_flight.load(Ordering::Relaxed))
}

#[tokio::test(start_paused = true)]
async fn round_robin_spreads_evenly() {
    let (_registry, balancer) = setup(3, Algorithm::RoundRobin);
    let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
    for _ in 0..300 {
        let pick = balancer.pick(&[], soon()).await.unwrap();
        *counts.entry(pick.endpoint.id.clone()).or_default() += 1;
        pick.record(Outcome::Response(Duration::from_millis(5)));
    }
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&c| c == 100), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_endpoint_but_uses_both() {
    let (_registry, balancer) = setup(2, Algorithm::P2cEwma);
    // Teach the balancer the latencies: api.0 is fast, api.1 ten times slower.
    for _ in 0..20 {
        let pick = balancer.pick(&[], soon()).await.unwrap();
        let took = if &*pick.endpoint.id == "api.0" {
            10
        } else {
            100
        };
        pick.record(Outcome::Response(Duration::from_millis(took)));
    }
    // One at a time, the fast one always wins.
    for _ in 0..20 {
        let pick = balancer.pick(&[], soon()).await.unwrap();
        assert_eq!(&*pick.endpoint.id, "api.0");
    }
    // Under concurrent load the in-flight factor sends some to the slow one as well.
    let mut held = Vec::new();
    for _ in 0..44 {
        held.push(balancer.pick(&[], soon()).await.unwrap());
    }
    let fast = held.iter().filter(|p| &*p.endpoint.id == "api.0").count();
    let slow = held.len() - fast;
    assert!(fast > 3 * slow, "fast={fast} slow={slow}");
    assert!(slow >= 2, "fast={fast} slow={slow}");
}

#[test]
fn peak_ewma_jumps_up_and_decays_down_with_time() {
    let start = Instant::now();
    let mut health = Health {
        rtt_ns: nanos(DEFAULT_RTT),
        observed_at: start,
        connect_failures: 0,
        ejected_until: None,
        breaker: BreakerState::default(),
    };
    health.observe(Duration::from_millis(100), start);
    assert_eq!(health.estimate(start), nanos(Duration::from_millis(100)));
    // A faster observation one time constant later moves the estimate by 1 − 1/e.
    let later = start + DECAY;
    health.observe(Duration::from_millis(10), later);
    let expected = 100e6 / std::f64::consts::E + 10e6 * (1.0 - 1.0 / std::f64::consts::E);
    assert!((health.rtt_ns - expected).abs() < 1.0, "{}", health.rtt_ns);
    // Unobserved, the estimate decays toward zero.
    assert!(health.estimate(later + DECAY * 5) < health.rtt_ns / 100.0);
}

#[tokio::test(start_paused = true)]
async fn pick_waits_for_an_endpoint_to_appear() {
    let (registry, balancer) = setup(0, Algorithm::P2cEwma);
    assert!(!balancer.has_endpoints());
    let start = Instant::now();
    let add = {
        let registry = registry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            registry.set("api", vec![ep(0)]);
        })
    };
    let pick = balancer
        .pick(&[], start + Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(pick.endpoint, ep(0));
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    assert!(balancer.has_endpoints());
    add.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pick_returns_none_at_the_deadline() {
    let (_registry, balancer) = setup(0, Algorithm::RoundRobin);
    let start = Instant::now();
    let pick = balancer.pick(&[], start + Duration::from_secs(3)).await;
    assert!(pick.is_none());
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    // A deadline already passed answers at once.
    assert!(balancer.pick(&[], Instant::now()).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn avoid_list_is_honoured_when_alternatives_exist() {
    for algorithm in [Algorithm::RoundRobin, Algorithm::P2cEwma] {
        let (_registry, balancer) = setup(3, algorithm);
        let avoid: Vec<Arc<str>> = vec!["api.0".into(), "api.2".into()];
        for _ in 0..20 {
            let pick = balancer.pick(&avoid, soon()).await.unwrap();
            assert_eq!(&*pick.endpoint.id, "api.1");
        }
        // Every endpoint tried: one of them is tried again rather than failing.
        let all: Vec<Arc<str>> = (0..3).map(|i| ep(i).id).collect();
        assert!(balancer.pick(&all, soon()).await.is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn connect_failure_ejects_until_the_ejection_expires() {
    let (_registry, balancer) = setup(2, Algorithm::RoundRobin);
    let pick = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*pick.endpoint.id, "api.0");
    pick.record(Outcome::ConnectFailed);
    for _ in 0..10 {
        let pick = balancer.pick(&[], soon()).await.unwrap();
        assert_eq!(&*pick.endpoint.id, "api.1");
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let ids: Vec<Arc<str>> = [
        balancer.pick(&[], soon()).await.unwrap(),
        balancer.pick(&[], soon()).await.unwrap(),
    ]
    .into_iter()
    .map(|p| p.endpoint.id.clone())
    .collect();
    assert!(ids.iter().any(|id| &**id == "api.0"), "{ids:?}");
}

#[tokio::test(start_paused = true)]
async fn consecutive_connect_failures_double_the_ejection() {
    let (_registry, balancer) = setup(1, Algorithm::P2cEwma);
    let start = Instant::now();
    for k in 1..=6u32 {
        let pick = balancer
            .pick(&[], Instant::now() + Duration::from_secs(60))
            .await
            .unwrap();
        let failed_at = Instant::now();
        pick.record(Outcome::ConnectFailed);
        assert!(!balancer.has_endpoints());
        // The only endpoint is ejected: the next pick waits out the ejection.
        let pick = balancer
            .pick(&[], Instant::now() + Duration::from_secs(60))
            .await
            .unwrap();
        let expected = Duration::from_secs(1 << (k - 1)).min(MAX_EJECTION);
        assert_eq!(failed_at.elapsed(), expected, "k={k}");
        if k < 6 {
            drop(pick);
        } else {
            // A response resets the count: the next ejection is the base one again.
            pick.record(Outcome::Response(Duration::from_millis(1)));
        }
    }
    let pick = balancer.pick(&[], soon()).await.unwrap();
    pick.record(Outcome::ConnectFailed);
    let failed_at = Instant::now();
    // A deadline before the ejection ends: no endpoint.
    assert!(
        balancer
            .pick(&[], failed_at + Duration::from_millis(500))
            .await
            .is_none()
    );
    assert!(
        balancer
            .pick(&[], failed_at + Duration::from_secs(5))
            .await
            .is_some()
    );
    assert_eq!(failed_at.elapsed(), BASE_EJECTION);
    assert!(start.elapsed() > Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn readded_endpoint_is_no_longer_ejected() {
    let (registry, balancer) = setup(2, Algorithm::RoundRobin);
    let pick = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*pick.endpoint.id, "api.0");
    pick.record(Outcome::ConnectFailed);
    // The replica stops being ready (its state is dropped), then comes back.
    registry.set("api", vec![ep(1)]);
    assert!(balancer.has_endpoints());
    assert_eq!(balancer.shared.state.lock().by_endpoint.len(), 1);
    registry.set("api", vec![ep(0), ep(1)]);
    let avoid: Vec<Arc<str>> = vec!["api.1".into()];
    let pick = balancer.pick(&avoid, soon()).await.unwrap();
    assert_eq!(&*pick.endpoint.id, "api.0");
}

#[tokio::test(start_paused = true)]
async fn all_ejected_waits_for_a_registry_change() {
    let (registry, balancer) = setup(1, Algorithm::P2cEwma);
    balancer
        .pick(&[], soon())
        .await
        .unwrap()
        .record(Outcome::ConnectFailed);
    let start = Instant::now();
    let registry2 = registry.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        registry2.set("api", vec![ep(0), ep(1)]);
    });
    let pick = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(pick.endpoint, ep(1));
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn in_flight_slots_are_held_until_drop_or_record() {
    let (_registry, balancer) = setup(2, Algorithm::P2cEwma);
    // Equal estimates: the in-flight count decides.
    let first = balancer.pick(&[], soon()).await.unwrap();
    let second = balancer.pick(&[], soon()).await.unwrap();
    assert_ne!(first.endpoint, second.endpoint);
    assert_eq!(in_flight(&balancer, &first.endpoint.id), 1);
    assert_eq!(in_flight(&balancer, &second.endpoint.id), 1);
    let clone = balancer.clone();
    let third = clone.pick(&[], soon()).await.unwrap();
    assert_eq!(in_flight(&balancer, &third.endpoint.id), 2);

    let (a, b) = (first.endpoint.id.clone(), second.endpoint.id.clone());
    first.record(Outcome::Response(Duration::from_millis(10)));
    drop(second);
    third.record(Outcome::Failed(Duration::from_millis(10)));
    assert_eq!(in_flight(&balancer, &a), 0);
    assert_eq!(in_flight(&balancer, &b), 0);
}

#[tokio::test(start_paused = true)]
async fn state_of_departed_endpoints_is_dropped() {
    let (registry, balancer) = setup(3, Algorithm::RoundRobin);
    let held = balancer.pick(&[], soon()).await.unwrap();
    registry.set("api", vec![ep(2)]);
    let pick = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(pick.endpoint, ep(2));
    assert_eq!(balancer.shared.state.lock().by_endpoint.len(), 1);
    // A pick of a departed endpoint can still be recorded and dropped.
    held.record(Outcome::ConnectFailed);
    assert!(balancer.has_endpoints());
}
