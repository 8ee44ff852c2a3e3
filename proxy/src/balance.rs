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
//! * with a [`Breaker`] (`traffic.circuit_breaker`), consecutive failures (connect
//!   failure, reset, timeout, 5xx, gRPC 2/4/13/14) eject the endpoint for
//!   `base_ejection` × 2^(k−1) capped at `max_ejection`; then the next pick is the one
//!   probe, whose outcome readmits the endpoint or ejects it again (k+1). A gRPC status
//!   in the trailers is known only after the body: [`Pick::defer`] takes the latency at
//!   header time and leaves the breaker's part to a [`Verdict`]. When every
//!   endpoint is ejected by it, [`Balancer::pick_or`] answers [`NoPick::CircuitOpen`] at
//!   once instead of waiting;
//! * `max_concurrent` caps the requests (tcp: connections) in flight through the
//!   balancer; [`Balancer::admit`] waits for a slot.
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
    /// A response arrived after this long, but it counts as a failure for the circuit
    /// breaker (5xx, or a failing gRPC status). Without a breaker it is a [`Outcome::Response`].
    ErrorResponse(Duration),
}

/// `traffic.circuit_breaker`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection; doubles with each consecutive ejection.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// At most this percentage of the endpoints is ejected at once (but one always can be).
    pub max_ejected_percent: u32,
}

/// The policies a balancer enforces besides choosing endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `traffic.circuit_breaker`; `None`: only connect failures eject.
    pub breaker: Option<Breaker>,
    /// `traffic.max_concurrent`: requests (tcp: connections) in flight at once.
    pub max_concurrent: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            breaker: None,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
        }
    }
}

/// The default of `traffic.max_concurrent`.
pub const DEFAULT_MAX_CONCURRENT: usize = 10_000;

/// Why [`Balancer::pick_or`] found no endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoPick {
    /// No endpoint became available before the deadline.
    NoEndpoints,
    /// Every endpoint is ejected, the circuit breaker's among them: fail at once.
    CircuitOpen,
}

/// A slot of `max_concurrent`, held for as long as the request (tcp: connection) is in
/// flight.
#[derive(Debug)]
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The balancer of one (caller, service) pair. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// A [`Balancer`] that may be gone (its outbound was removed or rebuilt).
#[derive(Clone, Debug)]
pub(crate) struct WeakBalancer(std::sync::Weak<Shared>);

impl WeakBalancer {
    pub(crate) fn upgrade(&self) -> Option<Balancer> {
        self.0.upgrade().map(|shared| Balancer { shared })
    }

    pub(crate) fn is(&self, balancer: &Balancer) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(&balancer.shared))
    }
}

/// One endpoint as a caller's balancer sees it ([`Balancer::view`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointView {
    /// `service.replica`.
    pub id: String,
    /// `ready`, `ejected` (connect failures), `breaker-open`, or `probing` (the circuit
    /// breaker's probe is in flight).
    pub state: &'static str,
    /// Tries in flight to it from this caller.
    pub in_flight: usize,
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
    /// The balancer, for the circuit breaker's count of ejected endpoints.
    shared: Arc<Shared>,
    /// Whether this pick is the one probe of an endpoint whose ejection ended.
    probe: bool,
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
        Self::with_policy(service, algorithm, Policy::default(), endpoints)
    }

    /// A balancer that also enforces `policy` (circuit breaker, `max_concurrent`).
    pub fn with_policy(
        service: &str,
        algorithm: Algorithm,
        policy: Policy,
        endpoints: watch::Receiver<Arc<[Endpoint]>>,
    ) -> Self {
        // Seed per balancer from std's randomly keyed hasher: no extra dependency, and
        // no global generator shared between balancers or tests.
        let seed = RandomState::new().hash_one(service) | 1;
        Balancer {
            shared: Arc::new(Shared {
                service: service.into(),
                algorithm,
                breaker: policy.breaker,
                slots: Arc::new(tokio::sync::Semaphore::new(
                    policy
                        .max_concurrent
                        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                )),
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

    /// Take a slot of `max_concurrent`, waiting until `deadline` for one to free up.
    /// `None` when the deadline passed first (`overloaded`).
    pub async fn admit(&self, deadline: Instant) -> Option<Admission> {
        let slots = Arc::clone(&self.shared.slots);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return Some(Admission { _permit: permit }),
            Err(tokio::sync::TryAcquireError::Closed) => return None,
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Some(Admission { _permit: permit }),
            _ => None,
        }
    }

    /// Choose an endpoint, preferring ones whose id is not in `avoid` (endpoints already
    /// tried), and waiting until `deadline` while no endpoint is available.
    /// `None` when the deadline passed with none (or the circuit is open).
    pub async fn pick(&self, avoid: &[Arc<str>], deadline: Instant) -> Option<Pick> {
        self.pick_or(avoid, deadline).await.ok()
    }

    /// [`Balancer::pick`], saying why there is no endpoint: the deadline passed, or every
    /// endpoint is ejected by the circuit breaker (answered at once, without waiting).
    pub async fn pick_or(&self, avoid: &[Arc<str>], deadline: Instant) -> Result<Pick, NoPick> {
        // A receiver of our own: `changed()` then wakes for updates after the list we
        // last looked at, whatever other picks did meanwhile.
        let mut rx = self.shared.endpoints.clone();
        let mut registry_open = true;
        loop {
            let list = rx.borrow_and_update().clone();
            let now = Instant::now();
            let readmit = match Shared::try_pick(&self.shared, list, avoid, now) {
                Ok(pick) => return Ok(pick),
                Err(Unavailable::CircuitOpen) => return Err(NoPick::CircuitOpen),
                Err(Unavailable::Until(readmit)) => readmit,
            };
            if now >= deadline {
                return Err(NoPick::NoEndpoints);
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

    /// Whether this balancer has a circuit breaker (`traffic.circuit_breaker`).
    pub fn has_breaker(&self) -> bool {
        self.shared.breaker.is_some()
    }

    /// The endpoints as this balancer sees them now, for the dashboard.
    pub fn view(&self) -> Vec<EndpointView> {
        let list = self.shared.endpoints.borrow().clone();
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        state.sync(list);
        state
            .order
            .iter()
            .map(|ep| {
                let health = ep.health.lock();
                let state = if health.breaker.probing {
                    "probing"
                } else if health.breaker.ejected_until.is_some() {
                    "breaker-open"
                } else if health.ejected_until.is_some_and(|until| until > now) {
                    "ejected"
                } else {
                    "ready"
                };
                EndpointView {
                    id: ep.endpoint.id.to_string(),
                    state,
                    in_flight: ep.in_flight.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// A handle that does not keep the balancer alive.
    pub(crate) fn downgrade(&self) -> WeakBalancer {
        WeakBalancer(Arc::downgrade(&self.shared))
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

/// Why nothing could be picked right now.
enum Unavailable {
    /// Wait: the earliest end of an ejection (`None`: no ejection will readmit anything).
    Until(Option<Instant>),
    /// Every endpoint is ejected, by the circuit breaker among others.
    CircuitOpen,
}

impl Shared {
    /// Choose among the available endpoints of `list`, or say why none is.
    fn try_pick(
        this: &Arc<Shared>,
        list: Arc<[Endpoint]>,
        avoid: &[Arc<str>],
        now: Instant,
    ) -> Result<Pick, Unavailable> {
        let mut guard = this.state.lock();
        guard.sync(list);
        // Borrow the fields apart: the candidates borrow `order` while `rng` and `next`
        // advance.
        let State {
            order, next, rng, ..
        } = &mut *guard;
        // An endpoint whose breaker ejection ended takes the next request as its probe,
        // unless this request already tried it.
        if this.breaker.is_some() {
            let probe = order
                .iter()
                .find(|ep| !avoid.contains(&ep.endpoint.id) && ep.take_probe(now));
            if let Some(chosen) = probe {
                chosen.in_flight.fetch_add(1, Ordering::Relaxed);
                let state = Arc::clone(chosen);
                drop(guard);
                tracing::debug!(endpoint = %state.endpoint.id, "circuit breaker probe");
                return Ok(Pick {
                    endpoint: state.endpoint.clone(),
                    state,
                    shared: Arc::clone(this),
                    probe: true,
                });
            }
        }
        // Kept on the stack for the usual handful of replicas: a pick allocates nothing.
        let available: Candidates<'_> = order.iter().filter(|ep| ep.is_available(now)).collect();
        if available.is_empty() {
            if this.breaker.is_some() && order.iter().any(|ep| ep.breaker_ejected()) {
                return Err(Unavailable::CircuitOpen);
            }
            let readmit = order.iter().filter_map(|ep| ep.ejected_until()).min();
            return Err(Unavailable::Until(readmit));
        }
        let fresh: Candidates<'_> = available
            .iter()
            .copied()
            .filter(|ep| !avoid.contains(&ep.endpoint.id))
            .collect();
        // Only already tried endpoints are left: trying one again beats failing.
        let (candidates, other) = if fresh.is_empty() {
            (available, fresh)
        } else {
            (fresh, available)
        };
        let chosen = match this.algorithm {
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
        // The candidate lists borrow the state: they go before its lock.
        drop((candidates, other));
        drop(guard);
        Ok(Pick {
            endpoint: chosen.endpoint.clone(),
            state: chosen,
            shared: Arc::clone(this),
            probe: false,
        })
    }

    /// How many endpoints the breaker may eject at once, and how many it has ejected.
    /// Takes the state lock, then each endpoint's health lock (the order `try_pick` uses).
    fn ejection_room(&self, breaker: &Breaker) -> (usize, usize) {
        let state = self.state.lock();
        let total = state.order.len();
        let ejected = state.order.iter().filter(|ep| ep.breaker_ejected()).count();
        let allowed = (total * breaker.max_ejected_percent as usize / 100).max(1);
        (allowed, ejected)
    }
}

// === impl Pick ===

impl Pick {
    /// Record how the try went; consumes the in-flight slot. `true` when this outcome
    /// ejected the endpoint (for the ejection metric).
    pub fn record(mut self, outcome: Outcome) -> bool {
        let ejected = self.observe(outcome);
        // The outcome settled the probe; `Drop` must not reopen it.
        self.probe = false;
        ejected
        // The in-flight slot is released by `Drop`.
    }

    /// Record an outcome but keep the in-flight slot, for a try that goes on after it
    /// (a tcp connection observes its connect time, then stays open and in flight).
    /// `true` when this outcome ejected the endpoint.
    pub fn observe(&self, outcome: Outcome) -> bool {
        let now = Instant::now();
        let failure = match outcome {
            Outcome::Response(_) => false,
            Outcome::ErrorResponse(_) | Outcome::ConnectFailed | Outcome::Failed(_) => true,
        };
        let ejected = self.observe_health(outcome, now);
        match self.shared.breaker {
            Some(breaker) => {
                let by_breaker = breaker_verdict(
                    &self.state,
                    &self.shared,
                    &breaker,
                    self.probe,
                    failure,
                    now,
                );
                ejected || by_breaker
            }
            None => ejected,
        }
    }

    /// Record the latency of a response whose circuit breaker verdict comes later (a gRPC
    /// status in the trailers, after the body): the latency estimate and the connect
    /// failure count are updated now, and the in-flight slot is released now, as
    /// [`Pick::record`] does; the returned [`Verdict`] settles the breaker (and a probe)
    /// when the outcome is known. Dropping the verdict unsettled counts nothing (and lets
    /// the next request probe).
    pub fn defer(mut self, took: Duration) -> Verdict {
        self.observe_health(Outcome::Response(took), Instant::now());
        let verdict = Verdict {
            state: Arc::clone(&self.state),
            shared: Arc::clone(&self.shared),
            probe: self.probe,
        };
        // The verdict owns the probe now; `Drop` must not reopen it.
        self.probe = false;
        verdict
        // The in-flight slot is released by `Drop`.
    }

    /// The part of an outcome that does not depend on the circuit breaker: the latency
    /// estimate and the connect-failure ejection. `true` when it ejected the endpoint.
    fn observe_health(&self, outcome: Outcome, now: Instant) -> bool {
        let mut health = self.state.health.lock();
        match outcome {
            Outcome::Response(took) | Outcome::ErrorResponse(took) => {
                health.observe(took, now);
                health.connect_failures = 0;
                false
            }
            Outcome::Failed(took) => {
                health.observe(took + FAILURE_PENALTY, now);
                false
            }
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
                true
            }
        }
    }
}

/// The circuit breaker's part of an outcome: a success resets the consecutive count (and
/// readmits a probed endpoint), a failure counts and may eject. `true` when it ejected.
fn breaker_verdict(
    state: &EndpointState,
    shared: &Shared,
    breaker: &Breaker,
    probe: bool,
    failure: bool,
    now: Instant,
) -> bool {
    if !failure {
        let mut health = state.health.lock();
        let b = &mut health.breaker;
        b.failures = 0;
        if b.ejected_until.is_some() && probe {
            tracing::debug!(endpoint = %state.endpoint.id, "probe succeeded, endpoint readmitted");
        }
        if probe || b.ejected_until.is_none() {
            b.ejected_until = None;
            b.ejections = 0;
            b.probing = false;
        }
        return false;
    }
    // Whether this failure ejects: decided under the health lock, applied after the
    // room check (which takes the state lock first, as `try_pick` does).
    let wants = {
        let mut health = state.health.lock();
        let b = &mut health.breaker;
        b.failures = b.failures.saturating_add(1);
        if probe {
            true
        } else {
            b.ejected_until.is_none() && b.failures >= breaker.consecutive_failures
        }
    };
    if !wants {
        return false;
    }
    if !probe {
        let (allowed, already) = shared.ejection_room(breaker);
        if already >= allowed {
            tracing::debug!(endpoint = %state.endpoint.id, allowed, "not ejected: max_ejected_percent reached");
            return false;
        }
    }
    let mut health = state.health.lock();
    let b = &mut health.breaker;
    b.ejections = b.ejections.saturating_add(1);
    b.failures = 0;
    b.probing = false;
    let doublings = (b.ejections - 1).min(30);
    let ejection = breaker
        .base_ejection
        .saturating_mul(1 << doublings)
        .min(breaker.max_ejection);
    b.ejected_until = Some(now + ejection);
    tracing::debug!(
        endpoint = %state.endpoint.id,
        ejection = ?ejection,
        k = b.ejections,
        "circuit breaker ejected the endpoint"
    );
    true
}

/// The circuit breaker verdict of a try whose response arrived but whose outcome is not
/// known yet (see [`Pick::defer`]). Holds no in-flight slot; holds the probe when the try
/// was one.
#[derive(Debug)]
pub struct Verdict {
    state: Arc<EndpointState>,
    shared: Arc<Shared>,
    probe: bool,
}

impl Verdict {
    /// Settle the breaker: `failure` counts toward an ejection (a probe's failure ejects
    /// again), a success resets the count (a probe's readmits). `true` when it ejected.
    pub fn settle(mut self, failure: bool) -> bool {
        let ejected = match self.shared.breaker {
            Some(breaker) => breaker_verdict(
                &self.state,
                &self.shared,
                &breaker,
                self.probe,
                failure,
                Instant::now(),
            ),
            None => false,
        };
        // Settled; `Drop` must not reopen the probe.
        self.probe = false;
        ejected
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if self.probe {
            // Abandoned unsettled (the client went away mid-body): let the next pick probe.
            self.state.health.lock().breaker.probing = false;
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if self.probe {
            // A probe abandoned without an outcome (its caller went away, or a tcp
            // connection ended after observing its connect): let the next pick probe.
            self.state.health.lock().breaker.probing = false;
        }
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === internals ===

#[derive(Debug)]
struct Shared {
    service: Arc<str>,
    algorithm: Algorithm,
    breaker: Option<Breaker>,
    /// `max_concurrent`.
    slots: Arc<tokio::sync::Semaphore>,
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
    /// The circuit breaker's view (unused without a breaker).
    breaker: BreakerState,
}

#[derive(Debug, Default)]
struct BreakerState {
    /// Consecutive failures.
    failures: u32,
    /// Consecutive ejections (k).
    ejections: u32,
    /// Set while ejected: the end of the ejection. It stays set (past) until a probe
    /// succeeds.
    ejected_until: Option<Instant>,
    /// The probe is in flight: nobody else may use the endpoint.
    probing: bool,
}

impl State {
    /// Bring the per-endpoint state in line with the registry's `list`: keep the state of
    /// endpoints still there, create it for new ones, drop it for departed ones.
    #[allow(
        clippy::mutable_key_type,
        reason = "an endpoint's hash and equality are its id, address and the identity of its local handle, never what the handle mutates"
    )]
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
                        breaker: BreakerState::default(),
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
    /// Neither ejected for connect failures nor by the breaker (an endpoint whose breaker
    /// ejection ended is only available as a probe, see [`EndpointState::take_probe`]).
    fn is_available(&self, now: Instant) -> bool {
        let health = self.health.lock();
        health.ejected_until.is_none_or(|until| until <= now)
            && health.breaker.ejected_until.is_none()
    }

    /// Claim the probe of an endpoint whose breaker ejection ended: `true` at most once
    /// per ejection while the probe is in flight.
    fn take_probe(&self, now: Instant) -> bool {
        let mut health = self.health.lock();
        let connect_ok = health.ejected_until.is_none_or(|until| until <= now);
        let b = &mut health.breaker;
        match b.ejected_until {
            Some(until) if until <= now && !b.probing && connect_ok => {
                b.probing = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the breaker holds this endpoint out (ejected, or its probe in flight).
    fn breaker_ejected(&self) -> bool {
        self.health.lock().breaker.ejected_until.is_some()
    }

    /// The end of a current or past ejection (the later of both kinds that applies).
    fn ejected_until(&self) -> Option<Instant> {
        let health = self.health.lock();
        match (health.ejected_until, health.breaker.ejected_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
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

/// The endpoints a pick chooses among: inline up to eight, on the heap beyond.
type Candidates<'a> = smallvec::SmallVec<[&'a Arc<EndpointState>; 8]>;

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
