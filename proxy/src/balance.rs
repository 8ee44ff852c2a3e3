//! Load balancing over a service's ready endpoints.
//!
//! A [`Balancer`] exists per (caller, service) pair and follows the service's ready
//! endpoints through a [`watch`] channel from [`crate::discovery::Registry`]. On top of
//! readiness it keeps passive health and latency per endpoint:
//!
//! * a connect failure ejects the endpoint for 1 s × 2^(k−1) (k consecutive connect
//!   failures), capped at 10 s; any response resets k;
//! * `p2c-ewma` keeps a peak-EWMA latency estimate per endpoint (linkerd's): a slower
//!   observation is taken at once, faster ones are blended in with a 10 s time constant,
//!   and the estimate decays toward zero while the endpoint is not observed, so a once
//!   slow endpoint is tried again after a while.
//!
//! Per-endpoint state is keyed by [`Endpoint`] (id and address) and dropped when the
//! endpoint leaves the registry, so an endpoint that comes back (a restarted replica that
//! became ready again) starts afresh, without its old ejection.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::discovery::Endpoint;

/// `traffic.load_balancer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency × in-flight load (default).
    P2cEwma,
    /// Rotate over the available endpoints.
    RoundRobin,
}

/// How a try against an endpoint went, for latency estimates and passive health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived (any status) after this long.
    Response(Duration),
    /// The endpoint could not be connected to (or the TLS handshake failed): it is
    /// taken out of rotation for a while.
    ConnectFailed,
    /// The connection broke or the try timed out after this long.
    Failed(Duration),
}

/// The balancer of one (caller, service) pair. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// An endpoint chosen for one try. Holds an in-flight slot until dropped or recorded.
#[derive(Debug)]
pub struct Pick {
    /// The chosen endpoint.
    pub endpoint: Endpoint,
    /// The endpoint's state: the in-flight count this pick holds a slot of, and where
    /// [`Pick::record`] writes. If the endpoint has left the registry meanwhile this is
    /// detached state, which is harmless to update.
    state: Arc<EndpointState>,
}

/// The first ejection after a connect failure; doubles per consecutive failure.
const BASE_EJECTION: Duration = Duration::from_secs(1);
/// The longest ejection.
const MAX_EJECTION: Duration = Duration::from_secs(10);
/// The time constant of the peak-EWMA decay.
const DECAY: Duration = Duration::from_secs(10);
/// The latency estimate of an endpoint never observed: small, so new endpoints (fresh
/// replicas, scale-up) get traffic at once.
const DEFAULT_RTT: Duration = Duration::from_millis(10);
/// Added to the duration of a failed try before it enters the estimate. Without it an
/// endpoint that fails fast (resets at once) would look fast and attract all traffic.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

// === impl Balancer ===

impl Balancer {
    /// A balancer over the endpoints published on `endpoints`.
    pub fn new(
        service: &str,
        algorithm: Algorithm,
        endpoints: watch::Receiver<Arc<[Endpoint]>>,
    ) -> Self {
        // Seed per balancer from std's randomly keyed hasher: no extra dependency, and
        // no global generator shared between balancers or tests.
        let seed = RandomState::new().hash_one(service) | 1;
        Balancer {
            shared: Arc::new(Shared {
                service: service.into(),
                algorithm,
                endpoints,
                state: Mutex::new(State {
                    seen: Arc::from(Vec::new()),
                    order: Vec::new(),
                    by_endpoint: HashMap::new(),
                    next: 0,
                    rng: seed,
                }),
            }),
        }
    }

    /// The service this balancer serves.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The algorithm this balancer uses.
    pub fn algorithm(&self) -> Algorithm {
        self.shared.algorithm
    }

    /// Choose an endpoint, preferring ones whose id is not in `avoid` (endpoints already
    /// tried), and waiting until `deadline` while no endpoint is available.
    /// `None` when the deadline passed with none.
    pub async fn pick(&self, avoid: &[Arc<str>], deadline: Instant) -> Option<Pick> {
        // A receiver of our own: `changed()` then wakes for updates after the list we
        // last looked at, whatever other picks did meanwhile.
        let mut rx = self.shared.endpoints.clone();
        let mut registry_open = true;
        loop {
            let list = rx.borrow_and_update().clone();
            let now = Instant::now();
            let readmit = match self.shared.try_pick(list, avoid, now) {
                Ok(pick) => return Some(pick),
                Err(readmit) => readmit,
            };
            if now >= deadline {
                return None;
            }
            // Nothing to pick: wait for the registry to change or an ejection to end.
            let wake = readmit.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                changed = rx.changed(), if registry_open => {
                    // A closed registry changes no more; only the timer can wake us.
                    registry_open = changed.is_ok();
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Whether any endpoint is currently available (ready and not ejected).
    pub fn has_endpoints(&self) -> bool {
        let list = self.shared.endpoints.borrow().clone();
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        state.sync(list);
        state.order.iter().any(|ep| ep.is_available(now))
    }
}

impl Shared {
    /// Choose among the available endpoints of `list`, or say when the earliest ejection
    /// ends (`None`: no ejection will readmit anything).
    fn try_pick(
        &self,
        list: Arc<[Endpoint]>,
        avoid: &[Arc<str>],
        now: Instant,
    ) -> Result<Pick, Option<Instant>> {
        let mut guard = self.state.lock();
        guard.sync(list);
        // Borrow the fields apart: the candidates borrow `order` while `rng` and `next`
        // advance.
        let State {
            order, next, rng, ..
        } = &mut *guard;
        let available: Vec<&Arc<EndpointState>> =
            order.iter().filter(|ep| ep.is_available(now)).collect();
        if available.is_empty() {
            let readmit = order.iter().filter_map(|ep| ep.ejected_until()).min();
            return Err(readmit);
        }
        let fresh: Vec<&Arc<EndpointState>> = available
            .iter()
            .copied()
            .filter(|ep| !avoid.contains(&ep.endpoint.id))
            .collect();
        // Only already tried endpoints are left: trying one again beats failing.
        let candidates = if fresh.is_empty() { available } else { fresh };
        let chosen = match self.algorithm {
            Algorithm::RoundRobin => {
                let index = *next % candidates.len();
                Arc::clone(candidates[index])
            }
            Algorithm::P2cEwma => {
                let n = candidates.len();
                if n == 1 {
                    Arc::clone(candidates[0])
                } else {
                    let (i, j) = two_distinct(rng, n);
                    let (a, b) = (candidates[i], candidates[j]);
                    if a.load(now) <= b.load(now) {
                        Arc::clone(a)
                    } else {
                        Arc::clone(b)
                    }
                }
            }
        };
        *next = next.wrapping_add(1);
        // Counted under the lock, so a concurrent pick already sees this one's load.
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        drop(guard);
        Ok(Pick {
            endpoint: chosen.endpoint.clone(),
            state: chosen,
        })
    }
}

// === impl Pick ===

impl Pick {
    /// Record how the try went; consumes the in-flight slot.
    pub fn record(self, outcome: Outcome) {
        self.observe(outcome);
        // The in-flight slot is released by `Drop`.
    }

    /// Record an outcome but keep the in-flight slot, for a try that goes on after it
    /// (a tcp connection observes its connect time, then stays open and in flight).
    pub fn observe(&self, outcome: Outcome) {
        let now = Instant::now();
        let mut health = self.state.health.lock();
        match outcome {
            Outcome::Response(took) => {
                health.observe(took, now);
                health.connect_failures = 0;
            }
            Outcome::Failed(took) => health.observe(took + FAILURE_PENALTY, now),
            Outcome::ConnectFailed => {
                health.connect_failures = health.connect_failures.saturating_add(1);
                let doublings = (health.connect_failures - 1).min(16);
                let ejection = BASE_EJECTION
                    .saturating_mul(1 << doublings)
                    .min(MAX_EJECTION);
                health.ejected_until = Some(now + ejection);
                tracing::debug!(
                    endpoint = %self.endpoint.id,
                    ejection = ?ejection,
                    "connect failed, endpoint ejected"
                );
            }
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === internals ===

#[derive(Debug)]
struct Shared {
    service: Arc<str>,
    algorithm: Algorithm,
    /// Never marked seen: every reader clones it and compares lists by pointer instead.
    endpoints: watch::Receiver<Arc<[Endpoint]>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The registry list `order` and `by_endpoint` were built from. The registry only
    /// publishes a new `Arc` when the set changed, so pointer equality means "no change".
    seen: Arc<[Endpoint]>,
    /// The endpoints in registry order (sorted by id), for a stable round-robin.
    order: Vec<Arc<EndpointState>>,
    by_endpoint: HashMap<Endpoint, Arc<EndpointState>>,
    /// Round-robin position.
    next: usize,
    /// xorshift64 state; never zero.
    rng: u64,
}

#[derive(Debug)]
struct EndpointState {
    endpoint: Endpoint,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug)]
struct Health {
    /// Peak-EWMA latency estimate, in nanoseconds, as of `observed_at`.
    rtt_ns: f64,
    observed_at: Instant,
    /// Consecutive connect failures (k), reset by any response.
    connect_failures: u32,
    ejected_until: Option<Instant>,
}

impl State {
    /// Bring the per-endpoint state in line with the registry's `list`: keep the state of
    /// endpoints still there, create it for new ones, drop it for departed ones.
    fn sync(&mut self, list: Arc<[Endpoint]>) {
        if Arc::ptr_eq(&self.seen, &list) {
            return;
        }
        let now = Instant::now();
        let mut old = std::mem::take(&mut self.by_endpoint);
        let mut order = Vec::with_capacity(list.len());
        for endpoint in list.iter() {
            let state = old.remove(endpoint).unwrap_or_else(|| {
                Arc::new(EndpointState {
                    endpoint: endpoint.clone(),
                    in_flight: AtomicUsize::new(0),
                    health: Mutex::new(Health {
                        rtt_ns: nanos(DEFAULT_RTT),
                        observed_at: now,
                        connect_failures: 0,
                        ejected_until: None,
                    }),
                })
            });
            self.by_endpoint
                .insert(endpoint.clone(), Arc::clone(&state));
            order.push(state);
        }
        self.order = order;
        self.seen = list;
    }
}

impl EndpointState {
    fn is_available(&self, now: Instant) -> bool {
        self.health
            .lock()
            .ejected_until
            .is_none_or(|until| until <= now)
    }

    /// The end of a current or past ejection.
    fn ejected_until(&self) -> Option<Instant> {
        self.health.lock().ejected_until
    }

    /// The p2c cost: latency estimate × (in-flight + 1). The `+ 1.0` keeps in-flight
    /// load visible when the estimate has decayed to nothing.
    fn load(&self, now: Instant) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed) as f64;
        (self.health.lock().estimate(now) + 1.0) * (in_flight + 1.0)
    }
}

impl Health {
    /// The estimate now: it decays toward zero while the endpoint is not observed, so an
    /// endpoint that was slow once is tried again eventually.
    fn estimate(&self, now: Instant) -> f64 {
        self.rtt_ns * self.decay(now)
    }

    /// Take in one latency observation: a slower one at once (peak), a faster one
    /// weighted by the time since the last observation.
    fn observe(&mut self, took: Duration, now: Instant) {
        let rtt = nanos(took);
        if rtt > self.rtt_ns {
            self.rtt_ns = rtt;
        } else {
            let decay = self.decay(now);
            self.rtt_ns = self.rtt_ns * decay + rtt * (1.0 - decay);
        }
        self.observed_at = now;
    }

    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.observed_at);
        (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
    }
}

/// Two distinct random indices below `n` (`n >= 2`).
fn two_distinct(rng: &mut u64, n: usize) -> (usize, usize) {
    let i = random_below(rng, n);
    let mut j = random_below(rng, n - 1);
    if j >= i {
        j += 1;
    }
    (i, j)
}

fn random_below(rng: &mut u64, n: usize) -> usize {
    // xorshift64 (Marsaglia); the modulo bias is irrelevant for balancing.
    let mut x = *rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    (x % n as u64) as usize
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

#[cfg(test)]
mod tests;
