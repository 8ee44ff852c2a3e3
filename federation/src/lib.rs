//! Endpoints shared between mesh hosts through etcd (SPEC §9).
//!
//! Each host writes its ready endpoints into etcd under a lease of its own and watches
//! the other hosts' endpoints. This crate knows endpoints (a service, a replica, an
//! address, an identity, a protocol), not processes or sockets of the mesh: the runtime
//! in `src/` registers a replica's inbound when the supervisor reports it ready, and
//! feeds the table of remote endpoints into the proxy's endpoint tables.
//!
//! # Usage
//!
//! ```no_run
//! use std::time::Duration;
//! use mesh_federation::{
//!     Client, Discovery, DiscoveryConfig, Endpoint, Protocol, Registry, RegistryConfig,
//! };
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::new(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])?;
//!
//! let registry = Registry::start(
//!     client.clone(),
//!     RegistryConfig::new("/mesh/shop", "edge-1", Duration::from_secs(10)),
//! )?;
//! registry
//!     .put(Endpoint {
//!         service: "api".into(),
//!         replica: 0,
//!         address: "10.0.0.5:41234".parse()?,
//!         identity: "spiffe://shop/api".into(),
//!         protocol: Protocol::Http,
//!     })
//!     .await?;
//!
//! let discovery = Discovery::start(client, DiscoveryConfig::new("/mesh/shop", "edge-1"))?;
//! let mut table = discovery.subscribe();
//! table.changed().await?;
//! for endpoint in table.borrow().endpoints("api") {
//!     println!("{} on {}", endpoint.address, endpoint.host);
//! }
//!
//! registry.shutdown().await?; // every key of edge-1 is deleted in one revision
//! discovery.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Key layout
//!
//! Everything lives under the mesh's prefix (`[mesh] etcd.prefix`, `/mesh/<name>` by
//! default):
//!
//! ```text
//! <prefix>/endpoints/<service>/<host>/<replica>
//!     {"address":"ip:port","identity":"spiffe://…","protocol":"http|grpc|tcp"}
//! ```
//!
//! * `service` is the service's name in `mesh.toml`, `host` the registering host's name,
//!   `replica` the replica's index in decimal. Names are single key segments (no `/`).
//! * The value is JSON, so `etcdctl get --prefix /mesh/shop/endpoints/` shows it as is.
//!   `address` is where other hosts connect (the replica's inbound on the host's
//!   `[mesh] listen` address), `identity` the SPIFFE id its certificate carries, and
//!   `protocol` what it speaks. Readers ignore fields they do not know.
//! * Every key of a host is attached to that host's one lease, so a host's endpoints
//!   disappear together: at once when it shuts down (the lease is revoked: one revision,
//!   one watch event), or when the lease's time to live runs out after it stopped
//!   keeping it alive (crashed, cut off).
//!
//! # Theory of operation
//!
//! * [`etcd`]: a client of etcd's JSON gateway (HTTP/1.1, hyper): key ranges, puts,
//!   deletes, leases, compaction, and watches as streamed responses. One connection per
//!   call, members tried in turn when one cannot be connected to, timeouts on every
//!   unary call. Errors name the call and the member.
//! * [`registry`]: this host's endpoints under its lease, the keep-alive task, and what
//!   it does when etcd fails or loses the lease (see the module).
//! * [`discovery`]: list the prefix, watch from the next revision, publish the other
//!   hosts' endpoints on a watch channel; stale-marking, backoff and re-listing on
//!   failures and compaction (see the module).
//! * Failures are retried after a jittered exponential [`Backoff`]; no loop retries
//!   without waiting.
//!
//! Nothing is global: every registry and discovery is an independent value with its own
//! task, stopped when the value is dropped.

pub mod backoff;
pub mod discovery;
pub mod endpoint;
pub mod etcd;
pub mod registry;
mod task;

pub use backoff::{Backoff, InvalidBackoff};
pub use discovery::{Discovery, DiscoveryConfig, RemoteEndpoints};
pub use endpoint::{Endpoint, NameError, Protocol, RemoteEndpoint};
pub use etcd::{Client, LeaseId};
pub use registry::{Registry, RegistryConfig, RegistryError};
