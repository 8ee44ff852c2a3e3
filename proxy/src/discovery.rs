//! The in-process endpoint registry, fed by the supervisor (a replica is an endpoint only
//! while it runs and is ready). Changes reach balancers at once through watch channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

/// One replica's inbound sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// `service.replica`, as error messages and `tried=` show it.
    pub id: Arc<str>,
    /// The replica's inbound listener.
    pub addr: SocketAddr,
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
