//! The sidecar proxies of `mesh`: inbound, outbound and ingress listeners, discovery and
//! load balancing, mesh errors.
//!
//! # Usage
//!
//! The root crate binds every listener once (ports stay stable for the life of the mesh),
//! feeds a [`discovery::Registry`] from the supervisor's status, and runs
//! [`outbound::serve`], [`inbound::serve`] and [`tcp`] servers with a
//! [`tokio_util::sync::CancellationToken`] as their shutdown signal.
//!
//! # Theory of operation
//!
//! ```text
//! caller app ──plain──▶ outbound (per caller × upstream) ── balancer picks an endpoint
//!                         │  HTTP/2, pooled per (caller, endpoint)
//!                         ▼
//!                       inbound (per replica) ──plain, caller's HTTP version──▶ app
//! ```
//!
//! An outbound first applies the called service's routes ([`routes`]): the matched
//! route picks the balancer (a route backend's, or the service's own), the timeout and
//! any injected fault. An inbound first takes a token from its replica's
//! [`ratelimit`] bucket, if the service has one.
//!
//! Between sidecars, HTTP travels over one multiplexed HTTP/2 connection per (caller,
//! endpoint). Two internal headers cross that hop and are stripped by the inbound:
//! [`HDR_SOURCE`] (the caller's identity, until mTLS carries it in the certificate) and
//! [`HDR_VERSION`] (the HTTP version the caller used, so the inbound speaks the same one
//! to the app).

pub mod balance;
pub mod discovery;
pub mod errors;
pub mod http;
pub mod inbound;
pub mod live;
pub mod metrics;
pub mod outbound;
pub mod ratelimit;
pub mod routes;
pub mod stats;
pub mod tcp;
pub mod tls;

use std::time::Duration;

use ::http::header::HeaderName;

/// Internal header: the identity (`spiffe://…`) of the calling sidecar.
pub const HDR_SOURCE: HeaderName = HeaderName::from_static("x-mesh-source");
/// Internal header: the HTTP version the calling app used (`1.1` or `2`).
pub const HDR_VERSION: HeaderName = HeaderName::from_static("x-mesh-http-version");

/// The protocol of a service (mirrors `protocol` in mesh.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

/// Traffic settings a caller's sidecar applies to calls to one service.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub load_balancer: balance::Algorithm,
    /// How long a request waits for a ready endpoint (SPEC §1 "Waiting for an upstream"),
    /// and for a `max_concurrent` slot.
    pub queue_timeout: Duration,
    /// `traffic.timeout`: from arrival to response headers (tcp: connection setup).
    pub timeout: Option<Duration>,
    /// `traffic.retries`; `None`: the default rule of SPEC §3 "Retries".
    pub retries: Option<outbound::RetryPolicy>,
    /// `traffic.circuit_breaker` and `traffic.max_concurrent`, enforced by the balancer.
    pub balance: balance::Policy,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            load_balancer: balance::Algorithm::P2cEwma,
            queue_timeout: Duration::from_secs(3),
            timeout: None,
            retries: None,
            balance: balance::Policy::default(),
        }
    }
}
