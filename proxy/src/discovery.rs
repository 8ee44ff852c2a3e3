//! The in-process endpoint registry, fed by the supervisor (a replica is an endpoint only
//! while it runs and is ready). Changes reach balancers at once through watch channels.
//!
//! An endpoint is either a replica's inbound in this process, reached through
//! [`Endpoint::local`] on the local path (SPEC §1), or an inbound listener reached over a
//! socket: the same process's with `local_path = "tls"`, or another host's (SPEC §9,
//! [`Endpoint::remote`]), always with mutual TLS when it is on. Balancing, retries, the
//! breaker and routes see no difference: the root crate decides which endpoints a
//! service has (another host's only while none of this host is ready).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

/// One replica's inbound sidecar.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `service.replica`, as error messages and `tried=` show it.
    pub id: Arc<str>,
    /// The replica's inbound listener.
    pub addr: SocketAddr,
    /// The inbound itself when it runs in this process and calls are to take the local
    /// path (SPEC §1): outbounds hand requests and streams to it instead of connecting to
    /// `addr`.
    pub local: Option<Local>,
}

impl Endpoint {
    /// An endpoint reached through its listener at `addr`.
    pub fn new(id: impl Into<Arc<str>>, addr: SocketAddr) -> Self {
        Endpoint {
            id: id.into(),
            addr,
            local: None,
        }
    }

    /// A replica of `service` on another host (`host`, its name in etcd), whose inbound
    /// listens at `addr`: reached over the socket path, with mutual TLS, like any inbound
    /// listener. Its id, `service.replica@host`, tells it apart from this host's replica
    /// of the same index in `tried=` and in logs.
    pub fn remote(service: &str, replica: u32, host: &str, addr: SocketAddr) -> Self {
        Endpoint::new(format!("{service}.{replica}@{host}"), addr)
    }

    /// This endpoint, reached in the process through `local`.
    pub fn with_local(mut self, local: Local) -> Self {
        self.local = Some(local);
        self
    }

    /// The HTTP inbound to hand requests to, on the local path.
    pub(crate) fn local_http(&self) -> Option<&crate::inbound::LocalInbound> {
        match &self.local {
            Some(Local::Http(inbound)) => Some(inbound),
            _ => None,
        }
    }

    /// The tcp inbound to hand streams to, on the local path.
    pub(crate) fn local_tcp(&self) -> Option<&crate::tcp::LocalTcpInbound> {
        match &self.local {
            Some(Local::Tcp(inbound)) => Some(inbound),
            _ => None,
        }
    }
}

// Identity and order are the id and the address: an inbound keeps its listener for its
// whole life, so the same address is the same inbound.
impl PartialEq for Endpoint {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.addr == other.addr && self.local == other.local
    }
}

impl Eq for Endpoint {}

impl PartialOrd for Endpoint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Endpoint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.id, self.addr).cmp(&(&other.id, other.addr))
    }
}

impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.addr.hash(state);
    }
}

/// A replica's inbound in this process, by protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Local {
    /// An http or grpc inbound.
    Http(crate::inbound::LocalInbound),
    /// A tcp inbound.
    Tcp(crate::tcp::LocalTcpInbound),
}

/// The publishing side of one service's endpoint set.
type Publisher = watch::Sender<Arc<[Endpoint]>>;

/// The set of ready endpoints of every service. Cheap to clone; clones share state.
#[derive(Clone, Default, Debug)]
pub struct Registry {
    services: Arc<Mutex<HashMap<String, Publisher>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the ready endpoints of `service` (sorted by id for stable order).
    /// Receivers are only woken when the set actually changed.
    pub fn set(&self, service: &str, mut endpoints: Vec<Endpoint>) {
        endpoints.sort();
        let tx = self.sender(service);
        tx.send_if_modified(|current| {
            if current[..] == endpoints[..] {
                false
            } else {
                *current = endpoints.into();
                true
            }
        });
    }

    /// Watch the ready endpoints of `service` (empty until it has some).
    pub fn watch(&self, service: &str) -> watch::Receiver<Arc<[Endpoint]>> {
        self.sender(service).subscribe()
    }

    fn sender(&self, service: &str) -> Publisher {
        self.services
            .lock()
            .entry(service.to_string())
            .or_insert_with(|| watch::channel(Arc::from(Vec::new())).0)
            .clone()
    }
}
