#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::discovery::{Endpoint, Registry};

fn ep(replica: usize) -> Endpoint {
    Endpoint::new(
        format!("api.{replica}"),
        SocketAddr::from(([127, 0, 0, 1], 10_000 + replica as u16)),
    )
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

// === circuit breaker and max_concurrent ===

fn breaker(consecutive_failures: u32, max_ejected_percent: u32) -> Breaker {
    Breaker {
        consecutive_failures,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(3),
        max_ejected_percent,
    }
}

fn with_breaker(n: usize, breaker: Breaker) -> (Registry, Balancer) {
    let registry = Registry::new();
    registry.set("api", (0..n).map(ep).collect());
    let policy = Policy {
        breaker: Some(breaker),
        max_concurrent: DEFAULT_MAX_CONCURRENT,
    };
    let balancer =
        Balancer::with_policy("api", Algorithm::RoundRobin, policy, registry.watch("api"));
    (registry, balancer)
}

/// Pick `id` (steering with the avoid list) and record `outcome`; whether it ejected.
async fn hit(balancer: &Balancer, n: usize, id: &str, outcome: Outcome) -> bool {
    let avoid: Vec<Arc<str>> = (0..n)
        .map(|i| Arc::from(format!("api.{i}")))
        .filter(|other: &Arc<str>| &**other != id)
        .collect();
    let pick = balancer.pick(&avoid, soon()).await.unwrap();
    assert_eq!(&*pick.endpoint.id, id);
    pick.record(outcome)
}

/// The ids the next `k` picks choose (each recorded as a fast success).
async fn next_ids(balancer: &Balancer, k: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..k {
        let pick = balancer.pick(&[], soon()).await.unwrap();
        ids.push(pick.endpoint.id.to_string());
        pick.record(Outcome::Response(Duration::from_millis(1)));
    }
    ids
}

const FAIL: Outcome = Outcome::ErrorResponse(Duration::from_millis(1));
const OK: Outcome = Outcome::Response(Duration::from_millis(1));

#[tokio::test(start_paused = true)]
async fn breaker_ejects_probes_once_and_doubles_up_to_max_ejection() {
    let (_registry, balancer) = with_breaker(2, breaker(2, 50));
    assert!(!hit(&balancer, 2, "api.0", FAIL).await);
    // Another endpoint's success does not reset api.0's count.
    assert!(!hit(&balancer, 2, "api.1", OK).await);
    assert!(
        hit(&balancer, 2, "api.0", FAIL).await,
        "second failure ejects"
    );

    // Ejected for base_ejection: only api.1 until then.
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(next_ids(&balancer, 4).await.iter().all(|id| id == "api.1"));
    tokio::time::advance(Duration::from_millis(1)).await;

    // The next pick is the one probe; while it is in flight nobody else gets api.0.
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0");
    assert!(next_ids(&balancer, 4).await.iter().all(|id| id == "api.1"));
    assert!(probe.record(FAIL), "a failed probe ejects again");

    // k = 2: 2 s.
    tokio::time::advance(Duration::from_millis(1999)).await;
    assert!(next_ids(&balancer, 2).await.iter().all(|id| id == "api.1"));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(hit(&balancer, 2, "api.0", FAIL).await);

    // k = 3: 4 s, capped at max_ejection = 3 s.
    tokio::time::advance(Duration::from_millis(2999)).await;
    assert!(next_ids(&balancer, 2).await.iter().all(|id| id == "api.1"));
    tokio::time::advance(Duration::from_millis(1)).await;
    // A successful probe readmits: round-robin over both again, and k starts over.
    assert!(!hit(&balancer, 2, "api.0", OK).await);
    let ids = next_ids(&balancer, 4).await;
    assert_eq!(ids.iter().filter(|id| *id == "api.0").count(), 2, "{ids:?}");
    assert!(!hit(&balancer, 2, "api.0", FAIL).await);
    assert!(hit(&balancer, 2, "api.0", FAIL).await);
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(next_ids(&balancer, 2).await.iter().all(|id| id == "api.1"));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        next_ids(&balancer, 1).await,
        ["api.0"],
        "k was reset: 1 s again"
    );
}

#[tokio::test(start_paused = true)]
async fn any_success_resets_the_consecutive_count() {
    let (_registry, balancer) = with_breaker(2, breaker(2, 50));
    assert!(!hit(&balancer, 2, "api.0", FAIL).await);
    assert!(!hit(&balancer, 2, "api.0", OK).await);
    assert!(!hit(&balancer, 2, "api.0", FAIL).await);
    // A reset and a timeout count as failures too.
    assert!(
        hit(
            &balancer,
            2,
            "api.0",
            Outcome::Failed(Duration::from_millis(1))
        )
        .await
    );
}

#[tokio::test(start_paused = true)]
async fn at_most_max_ejected_percent_but_always_one() {
    let (_registry, balancer) = with_breaker(4, breaker(1, 50));
    assert!(hit(&balancer, 4, "api.0", FAIL).await);
    assert!(hit(&balancer, 4, "api.1", FAIL).await);
    // 50 % of 4: a third endpoint stays in, failing or not.
    assert!(!hit(&balancer, 4, "api.2", FAIL).await);
    assert!(!hit(&balancer, 4, "api.2", FAIL).await);
    let ids = next_ids(&balancer, 4).await;
    assert!(
        ids.iter().all(|id| id == "api.2" || id == "api.3"),
        "{ids:?}"
    );

    // With one endpoint and 0 %, that one can still be ejected; then the circuit is open
    // at once, without waiting for the deadline.
    let (_registry, balancer) = with_breaker(1, breaker(1, 0));
    assert!(hit(&balancer, 1, "api.0", FAIL).await);
    let before = Instant::now();
    let far = before + Duration::from_secs(60);
    assert_eq!(
        balancer.pick_or(&[], far).await.err(),
        Some(NoPick::CircuitOpen)
    );
    assert_eq!(Instant::now(), before);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_probe_lets_the_next_request_probe() {
    let (_registry, balancer) = with_breaker(2, breaker(1, 50));
    assert!(hit(&balancer, 2, "api.0", FAIL).await);
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0");
    drop(probe);
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0", "the probe is offered again");
    assert!(!probe.record(OK));
}

/// Pick `id` (steering with the avoid list) and defer its verdict, as a gRPC response
/// whose status comes in the trailers.
async fn deferred(balancer: &Balancer, n: usize, id: &str) -> Verdict {
    let avoid: Vec<Arc<str>> = (0..n)
        .map(|i| Arc::from(format!("api.{i}")))
        .filter(|other: &Arc<str>| &**other != id)
        .collect();
    let pick = balancer.pick(&avoid, soon()).await.unwrap();
    assert_eq!(&*pick.endpoint.id, id);
    pick.defer(Duration::from_millis(1))
}

#[tokio::test(start_paused = true)]
async fn a_deferred_verdict_counts_when_settled_not_before() {
    let (_registry, balancer) = with_breaker(2, breaker(2, 50));
    // The latency is taken and the in-flight slot released at defer time.
    let first = deferred(&balancer, 2, "api.0").await;
    assert_eq!(in_flight(&balancer, "api.0"), 0);
    let second = deferred(&balancer, 2, "api.0").await;
    assert!(!first.settle(true));
    assert!(
        second.settle(true),
        "the second failure ejects, when it settles"
    );
    assert!(next_ids(&balancer, 3).await.iter().all(|id| id == "api.1"));

    // A deferred success resets the count; one dropped unsettled counts nothing.
    let (_registry, balancer) = with_breaker(2, breaker(2, 50));
    assert!(!deferred(&balancer, 2, "api.0").await.settle(true));
    assert!(!deferred(&balancer, 2, "api.0").await.settle(false));
    assert!(!deferred(&balancer, 2, "api.0").await.settle(true));
    drop(deferred(&balancer, 2, "api.0").await);
    assert!(deferred(&balancer, 2, "api.0").await.settle(true));
}

#[tokio::test(start_paused = true)]
async fn a_deferred_probe_settles_when_its_verdict_does() {
    let (_registry, balancer) = with_breaker(2, breaker(1, 50));
    assert!(hit(&balancer, 2, "api.0", FAIL).await);
    tokio::time::advance(Duration::from_secs(1)).await;

    // The probe's response arrived, its verdict is pending: still nobody else gets api.0.
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0");
    let verdict = probe.defer(Duration::from_millis(1));
    assert!(next_ids(&balancer, 3).await.iter().all(|id| id == "api.1"));
    // A failure in the trailers ejects again (k = 2: 2 s).
    assert!(verdict.settle(true));
    tokio::time::advance(Duration::from_millis(1999)).await;
    assert!(next_ids(&balancer, 2).await.iter().all(|id| id == "api.1"));
    tokio::time::advance(Duration::from_millis(1)).await;

    // Dropped unsettled (the client went away): the next request probes again.
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0");
    drop(probe.defer(Duration::from_millis(1)));
    let probe = balancer.pick(&[], soon()).await.unwrap();
    assert_eq!(&*probe.endpoint.id, "api.0", "the probe is offered again");

    // A success in the trailers readmits.
    assert!(!probe.defer(Duration::from_millis(1)).settle(false));
    let ids = next_ids(&balancer, 4).await;
    assert_eq!(ids.iter().filter(|id| *id == "api.0").count(), 2, "{ids:?}");
}

#[tokio::test(start_paused = true)]
async fn without_a_breaker_error_responses_do_not_eject() {
    let (_registry, balancer) = setup(1, Algorithm::RoundRobin);
    for _ in 0..10 {
        assert!(!hit(&balancer, 1, "api.0", FAIL).await);
    }
    assert!(hit(&balancer, 1, "api.0", Outcome::ConnectFailed).await);
}

#[tokio::test(start_paused = true)]
async fn max_concurrent_admits_up_to_the_limit_and_queues_until_the_deadline() {
    let registry = Registry::new();
    let policy = Policy {
        breaker: None,
        max_concurrent: 1,
    };
    let balancer =
        Balancer::with_policy("api", Algorithm::RoundRobin, policy, registry.watch("api"));
    let first = balancer.admit(soon()).await.unwrap();
    let started = Instant::now();
    assert!(
        balancer
            .admit(started + Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    // A waiter gets the slot as soon as it is given back.
    let waiter = {
        let balancer = balancer.clone();
        tokio::spawn(async move {
            balancer
                .admit(Instant::now() + Duration::from_secs(5))
                .await
        })
    };
    tokio::time::advance(Duration::from_millis(100)).await;
    drop(first);
    assert!(waiter.await.unwrap().is_some());
}
