//! Routes of a called service (SPEC §3 "Routes"), as a caller's outbound (or an
//! ingress) applies them: which route a request matches, which backend it goes to, and
//! which fault it gets.
//!
//! Matching is pure: the first route whose conditions all hold wins, and a request that
//! matches none goes to the service itself. `path_prefix` matches whole path segments
//! (`/v2` matches `/v2` and `/v2/x`, not `/v2beta`); header names are case-insensitive
//! and values match exactly. A matched request then draws, in this order and from one
//! generator per outbound: its backend (weights are relative), whether it is delayed,
//! and whether it is aborted. With a seed (`[mesh] seed` or `MESH_SEED`) the generator
//! of each (caller, service) pair starts from the same state in every run, so the same
//! sequence of requests gets the same backends and faults; unmatched requests draw
//! nothing. A tcp service's route is chosen per connection.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;

use crate::balance::Balancer;

/// One route, in the proxy's terms.
#[derive(Clone, Debug)]
pub struct Route {
    /// Matches whole path segments; `None` matches every path.
    pub path_prefix: Option<String>,
    /// Every header must be present with exactly this value.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where matched requests go, with relative weights.
    pub backends: Vec<(Backend, u32)>,
    /// Replaces the service's timeout for matched requests.
    pub timeout: Option<Duration>,
    /// Injected into matched requests (never into upgrades).
    pub fault: Option<Fault>,
}

/// A backend service of a route, as the caller's sidecar reaches it: through its own
/// balancer (its load balancer, breaker and endpoints) and its own `queue_timeout`.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The backend service's name.
    pub service: Arc<str>,
    /// The caller's balancer over the backend's endpoints.
    pub balancer: Balancer,
    /// The backend's `queue_timeout`.
    pub queue_timeout: Duration,
}

/// `fault = { delay, delay_percent, abort, abort_percent }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    /// How long a delayed request waits before it is forwarded.
    pub delay: Option<Duration>,
    /// The share of matched requests delayed, 0–100.
    pub delay_percent: f64,
    /// The status an aborted request is answered with (a `fault` mesh error).
    pub abort: Option<StatusCode>,
    /// The share of matched requests aborted, 0–100.
    pub abort_percent: f64,
}

/// The routes of one outbound (or ingress). Cheap to clone; clones share the generator.
/// The default has no routes: every request goes to the service itself.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    inner: Option<Arc<Inner>>,
}

/// What the route step decided for one request (or tcp connection).
#[derive(Debug, Default)]
pub struct Decision<'a> {
    /// The matched route's label for metrics (its index in the service's `routes`,
    /// from 0), or "" when no route matched.
    pub label: &'a str,
    /// The chosen backend; `None` means the service itself.
    pub backend: Option<&'a Backend>,
    /// The matched route's timeout.
    pub timeout: Option<Duration>,
    /// Delay the request by this much first.
    pub delay: Option<Duration>,
    /// Answer a `fault` mesh error with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

#[derive(Debug)]
struct Inner {
    routes: Vec<(String, Route)>,
    rng: Mutex<fastrand::Rng>,
}

// === impl Routes ===

impl Routes {
    /// The routes of a service for one caller. `seed` makes the draws repeatable;
    /// `stream` (e.g. "caller>service") gives each outbound its own sequence.
    pub fn new(routes: Vec<Route>, seed: Option<u64>, stream: &str) -> Self {
        if routes.is_empty() {
            return Routes::default();
        }
        let rng = match seed {
            Some(seed) => fastrand::Rng::with_seed(mix(seed, stream)),
            None => fastrand::Rng::new(),
        };
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i.to_string(), r))
            .collect();
        Routes {
            inner: Some(Arc::new(Inner {
                routes,
                rng: Mutex::new(rng),
            })),
        }
    }

    /// Whether there is any route.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// Every distinct backend of every route (by service name), for wiring and tests.
    pub fn backends(&self) -> Vec<&Backend> {
        let mut out: Vec<&Backend> = Vec::new();
        for (_, route) in self.inner.iter().flat_map(|i| i.routes.iter()) {
            for (backend, _) in &route.backends {
                if !out.iter().any(|b| b.service == backend.service) {
                    out.push(backend);
                }
            }
        }
        out
    }

    /// The route step for an HTTP request.
    pub fn decide(&self, path: &str, headers: &HeaderMap) -> Decision<'_> {
        let Some(inner) = &self.inner else {
            return Decision::default();
        };
        let Some((label, route)) = inner.routes.iter().find(|(_, r)| matches(r, path, headers))
        else {
            return Decision::default();
        };
        let mut rng = inner.rng.lock();
        let backend = choose(&route.backends, &mut rng);
        let (mut delay, mut abort) = (None, None);
        if let Some(fault) = &route.fault {
            if let Some(d) = fault.delay {
                delay = happens(fault.delay_percent, &mut rng).then_some(d);
            }
            if let Some(status) = fault.abort {
                abort = happens(fault.abort_percent, &mut rng).then_some(status);
            }
        }
        Decision {
            label,
            backend,
            timeout: route.timeout,
            delay,
            abort,
        }
    }

    /// The route step for a tcp connection: routes of a tcp service have only
    /// `backends`, so the first route takes every connection.
    pub fn decide_connection(&self) -> Decision<'_> {
        self.decide("/", &HeaderMap::new())
    }
}

/// Whether every condition of `route` holds for a request.
pub fn matches(route: &Route, path: &str, headers: &HeaderMap) -> bool {
    route
        .path_prefix
        .as_deref()
        .is_none_or(|prefix| path_matches(prefix, path))
        && route
            .headers
            .iter()
            .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
}

/// Whether `path` starts with `prefix` on a segment boundary: `/v2` matches `/v2`,
/// `/v2/` and `/v2/x`, not `/v2beta`. A trailing `/` on the prefix is ignored, and `/`
/// matches every path.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The index drawn by `draw` (in `0..sum of weights`) among `weights`: each index owns a
/// run of draws as long as its weight. `None` when every weight is 0 or `draw` is out
/// of range.
pub fn pick_weighted(weights: impl IntoIterator<Item = u32>, draw: u64) -> Option<usize> {
    let mut acc = 0u64;
    for (i, w) in weights.into_iter().enumerate() {
        acc += u64::from(w);
        if draw < acc {
            return Some(i);
        }
    }
    None
}

fn choose<'a>(backends: &'a [(Backend, u32)], rng: &mut fastrand::Rng) -> Option<&'a Backend> {
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let draw = rng.u64(0..total);
    pick_weighted(backends.iter().map(|(_, w)| *w), draw).map(|i| &backends[i].0)
}

/// Whether an event of `percent` (0–100) chance happens on this draw.
fn happens(percent: f64, rng: &mut fastrand::Rng) -> bool {
    rng.f64() * 100.0 < percent
}

/// A generator seed for one outbound from the mesh's seed and the outbound's name
/// (FNV-1a over the name, then a splitmix64 finaliser), the same on every run.
fn mix(seed: u64, stream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
