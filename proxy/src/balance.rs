//! Load balancing over a service's ready endpoints. (Interface; implementation in progress.)

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::discovery::Endpoint;

/// `traffic.load_balancer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency × in-flight load (default).
    P2cEwma,
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

/// The balancer of one (caller, service) pair.
#[derive(Clone, Debug)]
pub struct Balancer {
    _private: Arc<()>,
}

/// An endpoint chosen for one try. Holds an in-flight slot until dropped or recorded.
#[derive(Debug)]
pub struct Pick {
    pub endpoint: Endpoint,
}

impl Balancer {
    /// A balancer over the endpoints published on `endpoints`.
    pub fn new(service: &str, algorithm: Algorithm, endpoints: watch::Receiver<Arc<[Endpoint]>>) -> Self {
        let _ = (service, algorithm, endpoints);
        Balancer { _private: Arc::new(()) }
    }

    /// Choose an endpoint, preferring ones whose id is not in `avoid` (endpoints already
    /// tried), and waiting until `deadline` while no endpoint is available.
    /// `None` when the deadline passed with none.
    pub async fn pick(&self, avoid: &[Arc<str>], deadline: Instant) -> Option<Pick> {
        let _ = (avoid, deadline);
        None
    }

    /// Whether any endpoint is currently available (ready and not ejected).
    pub fn has_endpoints(&self) -> bool {
        false
    }
}

impl Pick {
    /// Record how the try went; consumes the in-flight slot.
    pub fn record(self, outcome: Outcome) {
        let _ = outcome;
    }
}
